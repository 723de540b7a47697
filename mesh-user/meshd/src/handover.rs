//! Hand-over between two agents of one node (a DaemonSet rolling update with `maxSurge`): the
//! agent that starts asks the running one for its same-node connections, the ones the kernel
//! carries on its own (spliced app sockets), so that an upgrade does not end them.
//!
//! The running agent listens on `<state dir>/handover.sock` (a Unix stream socket, mode 0600;
//! the state directory is the node's and root's alone; a peer that is not uid 0 is refused).
//! A starting agent, once it has listed the cluster's objects, connects and sends
//! `take-over <its pod UID>\n` ([`REQUEST`]). The running one refuses a pod that already
//! handed the node over (below). Otherwise it stops relaying those connections (each relay
//! stops between two writes and gives its two sockets up), closes its pods' listeners, its CNI
//! socket, API and metrics listeners, and sends the sockets as `SCM_RIGHTS`: messages of an
//! 8-byte header (pairs in the message, then 1 on the last message, both `u32`
//! little-endian) with two descriptors per pair, client side first, at most
//! [`PAIRS_PER_MESSAGE`] pairs each (the kernel passes at most 253 descriptors per message).
//! The old agent records its pod UID in `<state dir>/handover-retired` before it sends. The
//! new agent starts, takes the connections up and, once it serves (and unless it was told to
//! stop meanwhile), answers [`ACK`]
//! ([`Taken::confirm`]). The old agent keeps its ready file until then (a surge update deletes
//! an unready old pod at once), then drops it and stays idle until it is stopped. Without the
//! answer within [`CONFIRM_WAIT`] (the new agent died or hung, or the asker was not an agent)
//! the old agent takes its UID off the list again and exits with an error, so that the
//! kubelet restarts it and the node has an agent again.
//!
//! A pod whose UID is in `handover-retired` does not serve: when the kubelet restarts its
//! container (it crashed, or was killed before the rolling update deleted its pod), it idles
//! until stopped, and a running agent refuses its request, so the connections never go back to
//! the older agent, which the update is about to delete. It idles only while some agent holds
//! the state directory's lock ([`agent_runs`]); with none for 60 s (the new agent failed, or
//! the update was rolled back) it takes its UID off the list and exits, to serve again. The
//! old agent itself waits the same way after a confirmed hand-over.
//!
//! The new agent starts as after a restart (it adopts the pinned programs) and takes the
//! connections up (`Agent::start_taking_over`), asking its own rules about each; those it has
//! not taken up within [`mesh_agent::TAKE_UP_WITHIN`] are reset. Until they are taken up, a
//! rule change does not reach them (see `docs/dataplane.md`, "Rolling update").
//!
//! Connections through the proxy (TLS between nodes, L7) cannot be handed over: their state is
//! in the old agent's memory. They end with it, as on a restart.

use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
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

/// What a starting agent sends, then its pod's UID (empty outside a pod) and a newline.
pub const REQUEST: &str = "take-over";

/// What the new agent answers once it has every pair.
pub const ACK: &[u8] = b"taken\n";

/// The state directory's file of pods that handed their node over (one UID per line).
pub const RETIRED_FILE: &str = "handover-retired";

/// UIDs kept in [`RETIRED_FILE`] (the newest).
const RETIRED_KEPT: usize = 16;

/// Pairs per message: two descriptors each, within the kernel's `SCM_MAX_FD` (253).
pub const PAIRS_PER_MESSAGE: usize = 120;

/// How long a starting agent waits for the running one to hand over (it stops its relays,
/// closes its listeners and ends its other connections first).
const WAIT: Duration = Duration::from_secs(30);

/// How long the old agent waits for the new one to serve (its start: the API, the CRDs'
/// statuses, a leaf per service from `meshd ca`, meshing every pod).
pub const CONFIRM_WAIT: Duration = Duration::from_secs(120);

/// Asks the agent running with this state directory, if any, to hand its same-node
/// connections over, and returns them. No agent (no socket, or nobody listening on it): none.
///
/// # Errors
///
/// The running agent's answer is not the protocol's, or it does not answer within 30 s.
pub async fn take_over(state_dir: &Path, own_uid: Option<&str>) -> Result<Taken> {
    let path = state_dir.join(SOCKET_FILE);
    let uid = own_uid.unwrap_or_default().to_owned();
    tokio::task::spawn_blocking(move || request(&path, &uid))
        .await
        .context("the hand-over task")?
}

/// What the running agent handed over, and the connection to confirm on.
#[derive(Debug, Default)]
pub struct Taken {
    /// The same-node connections.
    pub pairs: Vec<SplicedPair>,
    predecessor: Option<UnixStream>,
}

impl Taken {
    /// Tells the previous agent that this one serves now ([`ACK`]): it then records that its
    /// pod handed over and idles until stopped. Call it once this agent serves the node.
    pub fn confirm(&mut self) {
        if let Some(mut stream) = self.predecessor.take() {
            match stream.write_all(ACK) {
                Ok(()) => info!("confirmed the hand-over to the previous agent"),
                Err(e) => {
                    warn!(error = %e, "confirming the hand-over; the previous agent may have gone")
                }
            }
        }
    }
}

fn request(path: &Path, own_uid: &str) -> Result<Taken> {
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(Taken::default())
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", path.display())),
    };
    info!(socket = %path.display(), "an agent runs on this node; asking it to hand over");
    stream.set_read_timeout(Some(WAIT))?;
    stream.set_write_timeout(Some(WAIT))?;
    stream.write_all(format!("{REQUEST} {own_uid}\n").as_bytes())?;
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
            if pairs.is_empty() {
                warn!("the running agent refused the hand-over or went away");
            } else {
                warn!("the running agent went away during the hand-over");
            }
            return Ok(Taken {
                pairs,
                predecessor: None,
            });
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
    Ok(Taken {
        pairs,
        predecessor: Some(stream),
    })
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
    pub fn bind(state_dir: &Path) -> Result<(Self, tokio::sync::oneshot::Receiver<Successor>)> {
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
        std::thread::Builder::new().name("handover".into()).spawn({
            let state_dir = state_dir.to_owned();
            move || {
                if let Some(successor) = answer(&listener, &state_dir) {
                    let _ = tx.send(successor);
                }
            }
        })?;
        Ok((Self { path }, rx))
    }

    /// Where it listens.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An agent that asked for the hand-over: its connection and pod UID (empty outside a pod).
#[derive(Debug)]
pub struct Successor {
    stream: UnixStream,
    /// Its pod's UID.
    pub uid: String,
}

/// Accepts until a root process sends a valid [`REQUEST`] from a pod that has not handed the
/// node over before; returns it. The listening socket closes with the thread, so a later
/// agent finds nobody here.
fn answer(listener: &UnixListener, state_dir: &Path) -> Option<Successor> {
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                warn!(error = %e, "hand-over socket: accept failed; no hand-over possible");
                return None;
            }
        };
        match nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(cred) if cred.uid() == 0 => {}
            other => {
                warn!(peer = ?other, "hand-over socket: a peer that is not root; ignored");
                continue;
            }
        }
        let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
        let mut request = [0u8; 128];
        let n = match stream.read(&mut request) {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "hand-over socket: no request; ignored");
                continue;
            }
        };
        let text = String::from_utf8_lossy(&request[..n]);
        let Some(uid) = text
            .strip_suffix('\n')
            .and_then(|t| t.strip_prefix(REQUEST))
            .and_then(|t| t.strip_prefix(' '))
        else {
            warn!(got = %text, "hand-over socket: not a hand-over request; ignored");
            continue;
        };
        if !uid.is_empty() && is_retired(state_dir, uid) {
            warn!(
                pod_uid = uid,
                "hand-over refused: that pod handed this node over already"
            );
            continue;
        }
        return Some(Successor {
            stream,
            uid: uid.to_owned(),
        });
    }
}

/// Whether pod `uid` handed this node over (see the module).
pub fn is_retired(state_dir: &Path, uid: &str) -> bool {
    std::fs::read_to_string(state_dir.join(RETIRED_FILE))
        .map(|text| text.lines().any(|l| l == uid))
        .unwrap_or(false)
}

/// Takes pod `uid` off the list again (its hand-over failed, or it finds no agent serving).
///
/// # Errors
///
/// The file cannot be written.
pub fn unretire(state_dir: &Path, uid: &str) -> Result<()> {
    write_retired(state_dir, uid, false)
}

/// Whether some agent runs with this state directory: it holds the API's lock
/// ([`mesh_api::LOCK_FILE`]) from its start to its stop.
pub fn agent_runs(state_dir: &Path) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let Ok(file) = std::fs::File::open(state_dir.join(mesh_api::LOCK_FILE)) else {
        return false;
    };
    // Taken (and let go at once) only if nobody holds it.
    Flock::lock(file, FlockArg::LockExclusiveNonblock).is_err()
}

/// Records that pod `uid` handed this node over (durably; the newest UIDs are kept).
///
/// # Errors
///
/// The file cannot be written.
pub fn retire(state_dir: &Path, uid: &str) -> Result<()> {
    write_retired(state_dir, uid, true)
}

/// Rewrites [`RETIRED_FILE`] durably with `uid` last (`add`) or without it, keeping the newest
/// [`RETIRED_KEPT`] UIDs.
fn write_retired(state_dir: &Path, uid: &str, add: bool) -> Result<()> {
    let path = state_dir.join(RETIRED_FILE);
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let mut uids: Vec<&str> = old.lines().filter(|l| !l.is_empty() && *l != uid).collect();
    if add {
        uids.push(uid);
    }
    let keep = &uids[uids.len().saturating_sub(RETIRED_KEPT)..];
    mesh_core::durable::write(&path, format!("{}\n", keep.join("\n")).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

/// Sends `pairs` to the agent taking over (see the module) and waits for its answer; the
/// descriptors travel with the messages, so this agent's copies may close right after.
///
/// # Errors
///
/// The successor went away, stopped reading, or did not confirm within [`CONFIRM_WAIT`]
/// (it confirms once it serves): the hand-over failed (its pairs' connections end with it).
pub fn give(successor: Successor, pairs: &[SplicedPair]) -> Result<()> {
    let mut stream = successor.stream;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    stream.set_read_timeout(Some(CONFIRM_WAIT))?;
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
            stream.as_raw_fd(),
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
    let mut answer = [0u8; 16];
    let got = stream
        .read(&mut answer)
        .context("waiting for the new agent's answer")?;
    ensure!(
        &answer[..got] == ACK,
        "the new agent did not confirm the hand-over (got {:?})",
        String::from_utf8_lossy(&answer[..got])
    );
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

    fn asking(dir: &Path, uid: &str) -> tokio::task::JoinHandle<Result<Taken>> {
        let dir = dir.to_owned();
        let uid = uid.to_owned();
        tokio::spawn(async move { take_over(&dir, Some(&uid)).await })
    }

    #[tokio::test]
    async fn sockets_cross_to_the_next_agent_in_order_and_in_several_messages() {
        let dir = tempfile::tempdir().unwrap();
        // Nobody there: nothing to take over.
        assert!(take_over(dir.path(), None).await.unwrap().pairs.is_empty());
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
        let taking = asking(dir.path(), "new-pod");
        let successor = asked.await.unwrap();
        assert_eq!(successor.uid, "new-pod");
        let giving = tokio::task::spawn_blocking(move || give(successor, &pairs));
        let mut taken = taking.await.unwrap().unwrap();
        assert_eq!(taken.pairs.len(), count);
        // The old agent waits until the new one says it serves.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!giving.is_finished());
        taken.confirm();
        giving.await.unwrap().unwrap();
        let taken = taken.pairs;
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
        assert!(take_over(dir.path(), Some("third"))
            .await
            .unwrap()
            .pairs
            .is_empty());
    }

    #[tokio::test]
    async fn strangers_and_a_pod_that_handed_over_are_refused_and_the_agent_still_answers() {
        let dir = tempfile::tempdir().unwrap();
        retire(dir.path(), "old-pod").unwrap();
        assert!(is_retired(dir.path(), "old-pod"));
        assert!(!is_retired(dir.path(), "new-pod"));
        let (listener, mut asked) = Listener::bind(dir.path()).unwrap();
        let mut stranger = UnixStream::connect(listener.path()).unwrap();
        stranger.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        // The pod that handed the node over gets nothing (the connection just closes).
        assert!(asking(dir.path(), "old-pod")
            .await
            .unwrap()
            .unwrap()
            .pairs
            .is_empty());
        assert!(asked.try_recv().is_err());
        let taking = asking(dir.path(), "new-pod");
        let successor = asked.await.unwrap();
        assert_eq!(successor.uid, "new-pod");
        let giving = tokio::task::spawn_blocking(move || give(successor, &[]));
        let mut taken = taking.await.unwrap().unwrap();
        assert!(taken.pairs.is_empty());
        taken.confirm();
        giving.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_hand_over_nobody_confirms_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (listener, asked) = Listener::bind(dir.path()).unwrap();
        // Asks, then goes away without reading a thing.
        let mut quitter = UnixStream::connect(listener.path()).unwrap();
        quitter.write_all(b"take-over quitter\n").unwrap();
        let successor = asked.await.unwrap();
        drop(quitter);
        let (p, _a, _c) = pair();
        let result = tokio::task::spawn_blocking(move || give(successor, &[p]))
            .await
            .unwrap();
        assert!(result.is_err(), "{result:?}");
    }

    #[test]
    fn a_held_api_lock_means_an_agent_runs() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!agent_runs(dir.path()), "no lock file");
        let file = std::fs::File::create(dir.path().join(mesh_api::LOCK_FILE)).unwrap();
        assert!(!agent_runs(dir.path()), "nobody holds it");
        let held =
            nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock).unwrap();
        assert!(agent_runs(dir.path()));
        drop(held);
        assert!(!agent_runs(dir.path()));
    }

    #[test]
    fn the_retired_list_keeps_the_newest_uids() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..RETIRED_KEPT + 4 {
            retire(dir.path(), &format!("pod-{i}")).unwrap();
        }
        assert!(!is_retired(dir.path(), "pod-0"));
        assert!(is_retired(dir.path(), &format!("pod-{}", RETIRED_KEPT + 3)));
        let text = std::fs::read_to_string(dir.path().join(RETIRED_FILE)).unwrap();
        assert_eq!(text.lines().count(), RETIRED_KEPT);
        unretire(dir.path(), &format!("pod-{}", RETIRED_KEPT + 3)).unwrap();
        assert!(!is_retired(
            dir.path(),
            &format!("pod-{}", RETIRED_KEPT + 3)
        ));
        assert!(is_retired(dir.path(), &format!("pod-{}", RETIRED_KEPT + 2)));
    }
}
