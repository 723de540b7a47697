//! Network namespaces: run work inside a pod's namespace on a dedicated thread.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so the agent enters a pod's namespace on a
//! short-lived thread, creates sockets there (they stay in that namespace for life), and hands them
//! back to the caller; the agent's other threads never change namespace.
#![forbid(unsafe_code)]

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespace {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path}: {source}")]
    Enter {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("in network namespace {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in network namespace {0} panicked")]
    Panicked(PathBuf),
}

/// A handle on a network namespace (`/run/netns/<name>` or `/proc/<pid>/ns/net`).
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, file })
    }

    /// The namespace named `name` by `ip netns add`.
    pub fn named(name: &str) -> Result<Self, Error> {
        Self::open(Path::new("/run/netns").join(name))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    pub fn run<T, F>(&self, f: F) -> Result<T, Error>
    where
        T: Send,
        F: FnOnce() -> io::Result<T> + Send,
    {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(self.file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| {
                        Error::Enter {
                            path: self.path.clone(),
                            source,
                        }
                    })?;
                    f().map_err(|source| Error::Io {
                        path: self.path.clone(),
                        source,
                    })
                })
                .join()
                .map_err(|_| Error::Panicked(self.path.clone()))?
        })
    }

    /// A TCP listener bound inside this namespace.
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, Error> {
        self.run(|| {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
    }

    /// A blocking TCP connection made from inside this namespace.
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
        self.run(|| TcpStream::connect(addr))
    }

    /// The namespace's cookie, as kernel programs see it (`bpf_get_netns_cookie`).
    pub fn cookie(&self) -> Result<u64, Error> {
        self.run(|| {
            use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
            let probe = socket(
                AddressFamily::Inet,
                SockType::Datagram,
                SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(io::Error::from)?;
            crate::sys::netns_cookie(probe.as_fd())
        })
    }
}

/// A thread that lives inside one network namespace and creates sockets there on request, so
/// that the agent can open connections from a pod without entering its namespace each time.
/// Sockets are created non-blocking; the caller connects them from any thread.
#[derive(Clone, Debug)]
pub struct SocketFactory {
    tx: std::sync::mpsc::Sender<Request>,
    path: PathBuf,
}

type Request = tokio::sync::oneshot::Sender<io::Result<socket2::Socket>>;

impl SocketFactory {
    /// Starts the factory thread for `netns`. The thread ends when every handle is dropped.
    pub fn spawn(netns: &NetNs, mark: Option<u32>) -> Result<Self, Error> {
        let file = netns.file().try_clone().map_err(|source| Error::Open {
            path: netns.path.clone(),
            source,
        })?;
        let path = netns.path.clone();
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("netns-sockets".into())
            .spawn(move || {
                let entered =
                    setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|source| Error::Enter {
                        path: thread_path,
                        source,
                    });
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                for reply in rx {
                    let _ = reply.send(new_tcp_socket(mark));
                }
            })
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        ready_rx
            .recv()
            .map_err(|_| Error::Panicked(path.clone()))??;
        Ok(Self { tx, path })
    }

    /// A new, unconnected, non-blocking TCP socket in the namespace.
    pub async fn tcp_socket(&self) -> io::Result<socket2::Socket> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(reply).map_err(|_| {
            io::Error::other(format!(
                "socket factory for {} stopped",
                self.path.display()
            ))
        })?;
        rx.await.map_err(|_| {
            io::Error::other(format!(
                "socket factory for {} stopped",
                self.path.display()
            ))
        })?
    }

    /// Connects from inside the namespace.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let sock = self.tcp_socket().await?;
        let std_stream: TcpStream = sock.into();
        tokio::net::TcpSocket::from_std_stream(std_stream)
            .connect(addr)
            .await
    }
}

fn new_tcp_socket(mark: Option<u32>) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if let Some(mark) = mark {
        sock.set_mark(mark)?;
    }
    sock.set_tcp_nodelay(true)?;
    Ok(sock)
}
