//! Hand-over between two agents of one node (a DaemonSet rolling update with `maxSurge`): the
//! agent that starts asks the running one for its same-node connections, the ones the kernel
//! carries on its own (spliced app sockets), so that an upgrade does not end them.
//!
//! The running agent listens on `<state dir>/handover.sock` (a Unix stream socket, mode 0600;
//! the state directory is the node's and root's alone). A starting agent connects
//! and sends [`REQUEST`]. The running one then stops relaying those connections (each relay
//! stops between two writes and gives its two sockets up), closes its pods' listeners, its CNI
//! socket, API and metrics listeners, and sends the sockets as `SCM_RIGHTS`: messages of an
//! 8-byte header (pairs in the message, then 1 on the last message, both `u32`
//! little-endian) with two descriptors per pair, client side first, at most
//! [`PAIRS_PER_MESSAGE`] pairs each (the kernel passes at most 253 descriptors per message).
//! It then stays idle until it is stopped, so that the kubelet does not restart it. The new
//! agent starts as after a restart (it adopts the pinned programs) and takes the connections up
//! (`Agent::start_taking_over`), asking its own rules about each.
//!
//! Connections through the proxy (TLS between nodes, L7) cannot be handed over: their state is
//! in the old agent's memory. They end with it, as on a restart.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_proxy::SplicedPair;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tracing::{info, warn};

/// The socket's file name in the state directory.
pub const SOCKET_FILE: &str = "handover.sock";

/// What a starting agent sends.
pub const REQUEST: &[u8] = b"take-over\n";

/// Pairs per message: two descriptors each, within the kernel's `SCM_MAX_FD` (253).
pub const PAIRS_PER_MESSAGE: usize = 120;

/// How long a starting agent waits for the running one to hand over (it stops its relays,
/// closes its listeners and ends its other connections first).
const WAIT: Duration = Duration::from_secs(30);

/// Asks the agent running with this state directory, if any, to hand its same-node
/// connections over, and returns them. No agent (no socket, or nobody listening on it): none.
///
/// # Errors
///
/// The running agent's answer is not the protocol's, or it does not answer within 30 s.
pub async fn take_over(state_dir: &Path) -> Result<Vec<SplicedPair>> {
    let path = state_dir.join(SOCKET_FILE);
    tokio::task::spawn_blocking(move || request(&path))
        .await
        .context("the hand-over task")?
}

fn request(path: &Path) -> Result<Vec<SplicedPair>> {
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    info!(socket = %path.display(), "an agent runs on this node; asking it to hand over");
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(REQUEST)?;
    let mut pairs = Vec::new();
    loop {
        // Exactly one message's 8 bytes: the kernel does not join messages that carry
        // descriptors, and a buffer of 8 never reads into the next one.
        let mut header = [0u8; 8];
        let got =
            mesh_dataplane::sys::recv_with_fds(stream.as_fd(), &mut header, 2 * PAIRS_PER_MESSAGE)
                .context("waiting for the running agent's hand-over")?;
        let (bytes, truncated, fds) = (got.bytes, got.truncated, got.fds);
        if bytes == 0 {
            warn!("the running agent went away during the hand-over");
            break;
        }
        ensure!(
            !truncated,
            "hand-over message with more descriptors than announced"
        );
        ensure!(bytes == 8, "hand-over message of {bytes} bytes, not 8");
        let count = u32::from_le_bytes(header[..4].try_into()?) as usize;
        let last = u32::from_le_bytes(header[4..].try_into()?) == 1;
        ensure!(
            fds.len() == 2 * count,
            "hand-over message announces {count} pairs and carries {} descriptors",
            fds.len()
        );
        let mut fds = fds.into_iter();
        while let (Some(client), Some(server)) = (fds.next(), fds.next()) {
            pairs.push(SplicedPair {
                client: std::net::TcpStream::from(client),
                server: std::net::TcpStream::from(server),
            });
        }
        if last {
            break;
        }
    }
    info!(
        connections = pairs.len(),
        "the running agent handed its same-node connections over"
    );
    Ok(pairs)
}

/// The running agent's end: answers one starting agent.
pub struct Listener {
    path: PathBuf,
}

impl Listener {
    /// Listens on `<state_dir>/handover.sock` (replacing a stale file) on a thread of its own;
    /// the receiver yields the connection of the first agent that asks for a hand-over.
    ///
    /// # Errors
    ///
    /// The socket cannot be created, bound or given mode 0600.
    pub fn bind(state_dir: &Path) -> Result<(Self, tokio::sync::oneshot::Receiver<OwnedFd>)> {
        let path = state_dir.join(SOCKET_FILE);
        // Whoever listened there was asked before this agent started (take_over).
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let listener =
            UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || {
                if let Some(successor) = answer(&listener) {
                    let _ = tx.send(successor);
                }
            })?;
        Ok((Self { path }, rx))
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Accepts until an agent sends [`REQUEST`]; returns its connection. The listening socket
/// closes with the thread, so a later agent finds nobody here.
fn answer(listener: &UnixListener) -> Option<OwnedFd> {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "hand-over socket: accept failed; no hand-over possible");
                return None;
            }
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut request = [0u8; 64];
        match stream.read(&mut request) {
            Ok(n) if &request[..n] == REQUEST => return Some(stream.into()),
            Ok(n) => warn!(
                got = %String::from_utf8_lossy(&request[..n]),
                "hand-over socket: not a hand-over request; ignored"
            ),
            Err(e) => warn!(error = %e, "hand-over socket: no request; ignored"),
        }
    }
}

/// Sends `pairs` to the agent taking over (see the module), then closes the connection; the
/// descriptors travel with the messages, so this agent's copies may close right after.
///
/// # Errors
///
/// The successor went away (its pairs' connections then end with this agent's copies).
pub fn give(successor: OwnedFd, pairs: &[SplicedPair]) -> Result<()> {
    let chunks: Vec<&[SplicedPair]> = if pairs.is_empty() {
        vec![&[]]
    } else {
        pairs.chunks(PAIRS_PER_MESSAGE).collect()
    };
    let n = chunks.len();
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut header = [0u8; 8];
        header[..4].copy_from_slice(&u32::try_from(chunk.len())?.to_le_bytes());
        header[4..].copy_from_slice(&u32::from(i + 1 == n).to_le_bytes());
        let fds: Vec<RawFd> = chunk
            .iter()
            .flat_map(|p| [p.client.as_raw_fd(), p.server.as_raw_fd()])
            .collect();
        let cmsgs = if fds.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        let sent = sendmsg::<()>(
            successor.as_raw_fd(),
            &[IoSlice::new(&header)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .context("sending the hand-over")?;
        if sent != header.len() {
            bail!("hand-over message cut short ({sent} of 8 bytes)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected loopback pair, as stand-ins for the proxy's two sockets.
    fn pair() -> (SplicedPair, std::net::TcpStream, std::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (d, _) = l.accept().unwrap();
        (
            SplicedPair {
                client: b,
                server: d,
            },
            a,
            c,
        )
    }

    #[tokio::test]
    async fn sockets_cross_to_the_next_agent_in_order_and_in_several_messages() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody there: nothing to take over.
        assert!(take_over(dir.path()).await.unwrap().is_empty());
        let (listener, asked) = Listener::bind(dir.path()).unwrap();
        let mode = std::fs::metadata(listener.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let count = PAIRS_PER_MESSAGE + 3;
        let mut pairs = Vec::new();
        let mut apps = Vec::new();
        for _ in 0..count {
            let (p, a, c) = pair();
            pairs.push(p);
            apps.push((a, c));
        }
        let taking = tokio::spawn({
            let dir = dir.path().to_owned();
            async move { take_over(&dir).await }
        });
        let successor = asked.await.unwrap();
        give(successor, &pairs).unwrap();
        drop(pairs);
        let taken = taking.await.unwrap().unwrap();
        assert_eq!(taken.len(), count);
        // Each handed socket is the same connection: what its app sends arrives there.
        for (i, (p, (a, c))) in taken.iter().zip(apps.iter_mut()).enumerate() {
            a.write_all(format!("client {i}").as_bytes()).unwrap();
            c.write_all(format!("server {i}").as_bytes()).unwrap();
            let mut buf = [0u8; 32];
            let n = (&p.client).read(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("client {i}").as_bytes());
            let n = (&p.server).read(&mut buf).unwrap();
            assert_eq!(&buf[..n], format!("server {i}").as_bytes());
        }
        // The listener answered once: a third agent finds nobody.
        assert!(take_over(dir.path()).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_stranger_on_the_socket_is_ignored_and_the_agent_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, asked) = Listener::bind(dir.path()).unwrap();
        let mut stranger = UnixStream::connect(listener.path()).unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let taking = tokio::spawn({
            let dir = dir.path().to_owned();
            async move { take_over(&dir).await }
        });
        let successor = asked.await.unwrap();
        give(successor, &[]).unwrap();
        assert!(taking.await.unwrap().unwrap().is_empty());
    }
}
