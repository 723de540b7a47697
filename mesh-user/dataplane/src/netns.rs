//! Network namespaces: run work inside a pod's namespace on a dedicated thread.
//!
//! `setns(CLONE_NEWNET)` changes only the calling thread, so the agent enters a pod's namespace on a
//! short-lived thread, creates sockets there (they stay in that namespace for life), and hands them
//! back to the caller; the agent's other threads never change namespace.
//!
//! Needs `setns(2)` (Linux 3.0) and `CAP_SYS_ADMIN`; [`NetNs::cookie`] needs more (see there).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::File;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nix::sched::{setns, CloneFlags};

/// What can go wrong working in a network namespace. Every variant names the namespace file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened (or its descriptor duplicated).
    #[error("network namespace {path}: {source}")]
    Open {
        /// The namespace file.
        path: PathBuf,
        /// The underlying error (`NotFound` when the namespace is gone).
        #[source]
        source: io::Error,
    },
    /// `setns(CLONE_NEWNET)` refused: `EPERM` without `CAP_SYS_ADMIN`, `EINVAL` when the file
    /// is not a network namespace.
    #[error("entering network namespace {path}: {source}")]
    Enter {
        /// The namespace file.
        path: PathBuf,
        /// The errno from `setns`.
        #[source]
        source: nix::Error,
    },
    /// The work done inside the namespace failed, or the worker thread could not be spawned.
    #[error("in network namespace {path}: {source}")]
    Io {
        /// The namespace file.
        path: PathBuf,
        /// The error the work (or `std::thread::Builder::spawn`) returned.
        #[source]
        source: io::Error,
    },
    /// The thread working inside the namespace panicked, or died before reporting whether it
    /// entered the namespace.
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
    /// Opens the namespace file at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`, or a
    /// bind mount of one). Opening does not enter it.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] if the file cannot be opened. A file that is not a network namespace is
    /// only noticed when entered ([`Error::Enter`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| Error::Open {
            path: path.clone(),
            source,
        })?;
        Ok(Self { path, file })
    }

    /// The namespace named `name` by `ip netns add`, that is `/run/netns/<name>`.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] if there is no such namespace or it cannot be opened.
    pub fn named(name: &str) -> Result<Self, Error> {
        Self::open(Path::new("/run/netns").join(name))
    }

    /// The path the namespace was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open namespace file, the descriptor `setns` and `nsenter`-style callers take.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on a fresh thread that has entered this namespace, and returns its result.
    /// The calling thread stays where it is; sockets `f` creates stay in this namespace.
    ///
    /// # Errors
    ///
    /// [`Error::Enter`] if `setns` fails (then `f` does not run), [`Error::Io`] wrapping the
    /// error `f` returns, [`Error::Panicked`] if `f` panics.
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

    /// A TCP listener bound to `addr` inside this namespace, already non-blocking (ready for
    /// `tokio::net::TcpListener::from_std`).
    ///
    /// # Errors
    ///
    /// As [`NetNs::run`]; [`Error::Io`] carries the bind error (`AddrInUse`, `AddrNotAvailable`
    /// when the namespace has no such address, ...).
    pub fn listen(&self, addr: SocketAddr) -> Result<TcpListener, Error> {
        self.run(|| {
            let listener = TcpListener::bind(addr)?;
            listener.set_nonblocking(true)?;
            Ok(listener)
        })
    }

    /// A blocking TCP connection to `addr` made from inside this namespace; the call blocks
    /// until the connection is established or refused.
    ///
    /// # Errors
    ///
    /// As [`NetNs::run`]; [`Error::Io`] carries the connect error.
    pub fn connect(&self, addr: SocketAddr) -> Result<TcpStream, Error> {
        self.run(|| TcpStream::connect(addr))
    }

    /// The namespace's cookie, as kernel programs see it (`bpf_get_netns_cookie`): a 64-bit
    /// id unique for the boot, read through a throwaway UDP socket created inside the
    /// namespace.
    ///
    /// Needs `SO_NETNS_COOKIE` (Linux 5.14); on older kernels the read fails with `ENOPROTOOPT`.
    ///
    /// # Errors
    ///
    /// As [`NetNs::run`]; [`Error::Io`] carries the socket or `getsockopt` error.
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
///
/// Once asked for a socket, the factory keeps a stock of up to [`SocketFactory::STOCK`] ready
/// ones: a request takes one from the stock without waking the thread, and the thread makes a
/// batch whenever the stock runs low, so a busy pod's connections cost one thread hand-off per
/// batch rather than two context switches each. Stocked sockets are unconnected and unbound
/// (one descriptor each); they go when the last handle does.
#[derive(Clone, Debug)]
pub struct SocketFactory {
    tx: std::sync::mpsc::Sender<Request>,
    path: PathBuf,
    stock: Arc<Stock>,
}

/// Marks sockets as the agent's own in the kernel's eyes: the agent's socket storage map
/// ([`mesh_common::MAP_AGENT_SOCKS`]), from `bpf::Dataplane::socket_tag`.
#[derive(Clone, Debug)]
pub struct SocketTag(Arc<std::os::fd::OwnedFd>);

impl SocketTag {
    pub(crate) fn new(map: std::os::fd::OwnedFd) -> Self {
        Self(Arc::new(map))
    }

    /// Writes `socket`'s value in the map.
    ///
    /// # Errors
    ///
    /// As [`crate::sys::sk_storage_set`].
    pub fn put_on(&self, socket: &impl AsFd) -> io::Result<()> {
        crate::sys::sk_storage_set(self.0.as_fd(), socket.as_fd(), 1)
    }
}

/// Sockets made ahead, and whether a batch is on its way.
#[derive(Debug, Default)]
struct Stock {
    sockets: Mutex<Vec<socket2::Socket>>,
    refilling: AtomicBool,
    /// Requests that found the stock empty.
    misses: AtomicU64,
}

impl Stock {
    /// A stocked socket, if any, and whether the stock is low (a batch should be made).
    fn take(&self) -> (Option<socket2::Socket>, bool) {
        let mut sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
        let socket = sockets.pop();
        let low = sockets.len() <= SocketFactory::STOCK / 2;
        (socket, low)
    }

    /// Fills the stock up to [`SocketFactory::STOCK`]; stops at the first error (the next
    /// request that finds the stock empty asks for a socket of its own and sees it).
    fn refill(&self, mark: Option<u32>, tag: Option<&SocketTag>) {
        let missing = {
            let sockets = self.sockets.lock().unwrap_or_else(|e| e.into_inner());
            SocketFactory::STOCK.saturating_sub(sockets.len())
        };
        let mut made = Vec::with_capacity(missing);
        for _ in 0..missing {
            match new_tcp_socket(mark, tag) {
                Ok(socket) => made.push(socket),
                Err(_) => break,
            }
        }
        self.sockets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(made);
        self.refilling.store(false, Ordering::Release);
    }
}

enum Request {
    /// One socket, made now.
    One(tokio::sync::oneshot::Sender<io::Result<socket2::Socket>>),
    /// Fill the stock.
    Refill,
}

impl SocketFactory {
    /// Starts the factory thread for `netns`. The thread ends when every handle is dropped.
    /// Every socket it makes carries `mark` as `SO_MARK` when given (setting a mark needs
    /// `CAP_NET_ADMIN`), `tag` when given (the agent's [`SocketTag`]: only sockets with it may
    /// be spliced), and has `TCP_NODELAY` set.
    ///
    /// Returns once the thread has entered the namespace.
    ///
    /// # Errors
    ///
    /// [`Error::Open`] if the namespace descriptor cannot be duplicated, [`Error::Io`] if the
    /// thread cannot be spawned, [`Error::Enter`] if it cannot enter the namespace.
    pub fn spawn(netns: &NetNs, mark: Option<u32>, tag: Option<SocketTag>) -> Result<Self, Error> {
        let file = netns.file().try_clone().map_err(|source| Error::Open {
            path: netns.path.clone(),
            source,
        })?;
        let path = netns.path.clone();
        let stock = Arc::new(Stock::default());
        // The thread holds the stock only weakly: the stock goes with the last handle, and the
        // thread with the channel.
        let thread_stock = Arc::downgrade(&stock);
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
                for request in rx {
                    match request {
                        Request::One(reply) => {
                            // A refill queued before this request may have stocked one.
                            let stocked = thread_stock.upgrade().and_then(|stock| stock.take().0);
                            let _ = reply.send(
                                stocked.map_or_else(|| new_tcp_socket(mark, tag.as_ref()), Ok),
                            );
                        }
                        Request::Refill => {
                            if let Some(stock) = thread_stock.upgrade() {
                                stock.refill(mark, tag.as_ref());
                            }
                        }
                    }
                }
            })
            .map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        ready_rx
            .recv()
            .map_err(|_| Error::Panicked(path.clone()))??;
        Ok(Self { tx, path, stock })
    }

    /// How many sockets the factory keeps made ahead (a batch is made when half are used).
    pub const STOCK: usize = 8;

    /// How many requests for a socket found the stock empty and waited for the thread (the
    /// first request always does; more mean requests come faster than batches are made).
    pub fn stock_misses(&self) -> u64 {
        self.stock.misses.load(Ordering::Relaxed)
    }

    /// A new, unconnected, non-blocking IPv4 TCP socket in the namespace: from the stock when
    /// it has one, else made by the thread now.
    ///
    /// # Errors
    ///
    /// `io::ErrorKind::Other` if the factory thread has stopped; otherwise the error of
    /// creating the socket or setting its options (`EPERM` for the mark without
    /// `CAP_NET_ADMIN`).
    pub async fn tcp_socket(&self) -> io::Result<socket2::Socket> {
        let (stocked, low) = self.stock.take();
        if low && !self.stock.refilling.swap(true, Ordering::AcqRel) {
            // A thread that stopped also fails the request below, or the next one.
            if self.tx.send(Request::Refill).is_err() {
                self.stock.refilling.store(false, Ordering::Release);
            }
        }
        if let Some(socket) = stocked {
            return Ok(socket);
        }
        self.stock.misses.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Request::One(reply)).map_err(|_| {
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

    /// Connects to `addr` (IPv4) from inside the namespace with a socket from
    /// [`SocketFactory::tcp_socket`].
    ///
    /// # Errors
    ///
    /// The errors of [`SocketFactory::tcp_socket`], then the connect error.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let sock = self.tcp_socket().await?;
        let std_stream: TcpStream = sock.into();
        tokio::net::TcpSocket::from_std_stream(std_stream)
            .connect(addr)
            .await
    }
}

fn new_tcp_socket(mark: Option<u32>, tag: Option<&SocketTag>) -> io::Result<socket2::Socket> {
    let sock = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::STREAM.nonblocking().cloexec(),
        None,
    )?;
    if let Some(mark) = mark {
        sock.set_mark(mark)?;
    }
    sock.set_tcp_nodelay(true)?;
    if let Some(tag) = tag {
        // Only a splice needs the tag: without it the connection is relayed by the proxy
        // (`Splices::pair` finds the app's socket missing), so a failure costs speed, not the
        // connection.
        if let Err(error) = tag.put_on(&sock) {
            tracing::warn!(%error, "socket not tagged as the agent's: its connections will not be spliced");
        }
    }
    Ok(sock)
}
