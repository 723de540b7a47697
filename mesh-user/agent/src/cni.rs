//! The agent's side of `mesh-cni`: a Unix socket (mode 0600, so only root on the node can ask
//! the agent to mesh a pod) where each connection carries one [`Request`] and gets one
//! [`Reply`] (the wire of [`mesh_cni::wire`]).
//!
//! The server does not decide anything: it decodes each request and hands it, as a
//! [`CniRequest`], to the agent mode that runs it (`meshd run` looks the pod up in its
//! catalog; `meshd kubernetes` in the API server's pods), which answers when the pod is meshed
//! (attached and listening), not in the mesh, or refused.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_cni::wire::{self, Reply, Request};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

pub use mesh_cni::wire::{Pod as CniPod, Reply as CniReply, Request as CniCall};

/// How long a client has to send its request line once connected.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// How many requests may wait for the agent at once before new connections wait to be
/// queued.
const QUEUE: usize = 64;

/// What can go wrong serving the socket.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Another process answers on the socket already (a second agent on the node).
    #[error("CNI socket {0}: another process is serving it")]
    InUse(PathBuf),
    /// Creating the directory, removing a stale socket, binding or setting the mode failed.
    #[error("CNI socket {path}: {what}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// The step that failed.
        what: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
}

/// One decoded request waiting for the agent's answer. Dropping it unanswered tells the plugin
/// that the agent is stopping (the `ADD` fails, to be retried by the runtime).
#[derive(Debug)]
pub struct CniRequest {
    /// What the plugin asks.
    pub request: Request,
    reply: oneshot::Sender<Reply>,
}

impl CniRequest {
    /// Sends the answer to the plugin.
    pub fn answer(self, reply: Reply) {
        // The plugin gave up (its timeout) if this fails; it has reported that itself.
        let _ = self.reply.send(reply);
    }
}

/// The listening socket; stops listening and removes the socket file when dropped.
pub struct CniServer {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl CniServer {
    /// Listens on `path` (its directory is created, mode 0700 when new; a stale socket file
    /// left by an agent that died is replaced) with mode 0600, and returns the server with the
    /// stream of decoded requests, to be answered by the caller.
    ///
    /// # Errors
    ///
    /// [`Error::InUse`] if a live process answers on `path`, [`Error::Io`] naming the step
    /// otherwise.
    pub async fn bind(path: &Path) -> Result<(Self, mpsc::Receiver<CniRequest>), Error> {
        let io_err = |what: &'static str| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, what, source }
        };
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                std::fs::create_dir_all(dir).map_err(io_err("creating its directory"))?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(io_err("setting its directory's mode"))?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).await.is_ok() {
                    return Err(Error::InUse(path.to_path_buf()));
                }
                std::fs::remove_file(path).map_err(io_err("removing the stale socket"))?;
            }
            Ok(_) => {
                return Err(Error::Io {
                    path: path.to_path_buf(),
                    what: "checking the path",
                    source: io::Error::new(io::ErrorKind::AlreadyExists, "not a socket"),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("checking the path")(e)),
        }
        let listener = UnixListener::bind(path).map_err(io_err("binding"))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("setting its mode"))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(accept_loop(listener, tx));
        info!(socket = %path.display(), "CNI socket serving");
        Ok((
            Self {
                path: path.to_path_buf(),
                task,
            },
            rx,
        ))
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for CniServer {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn accept_loop(listener: UnixListener, tx: mpsc::Sender<CniRequest>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Only root (the container runtime that runs `mesh-cni`) may ask: the socket's
                // mode says so too, but it is set after `bind`, and a hostPath directory may be
                // wider than the agent's own.
                match stream.peer_cred() {
                    Ok(cred) if cred.uid() == 0 => {
                        tokio::spawn(serve(stream, tx.clone()));
                    }
                    Ok(cred) => {
                        warn!(uid = cred.uid(), pid = ?cred.pid(), "CNI socket: a caller that is not root, refused");
                    }
                    Err(e) => warn!(error = %e, "CNI socket: the caller's credentials"),
                }
            }
            Err(e) => {
                warn!(error = %e, "accepting on the CNI socket");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One connection: a request line in, a reply line out.
async fn serve(stream: UnixStream, tx: mpsc::Sender<CniRequest>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read).take(wire::MAX_LINE as u64 + 1);
    let mut line = Vec::new();
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let reply = match read {
        Err(_) => Reply::Invalid {
            reason: format!("no request line within {READ_TIMEOUT:?}"),
        },
        Ok(Err(e)) => Reply::Invalid {
            reason: format!("reading the request: {e}"),
        },
        Ok(Ok(n)) => match wire::decode_line::<Request>(&line, n) {
            Err(e) => Reply::Invalid {
                reason: format!("the request does not decode: {e}"),
            },
            Ok(request) => {
                debug!(?request, "CNI request");
                let (reply, answer) = oneshot::channel();
                if tx.send(CniRequest { request, reply }).await.is_err() {
                    stopping()
                } else {
                    answer.await.unwrap_or_else(|_| stopping())
                }
            }
        },
    };
    let mut out = match serde_json::to_vec(&reply) {
        Ok(v) => v,
        Err(e) => {
            warn!(error = %e, "encoding a CNI reply");
            return;
        }
    };
    out.push(b'\n');
    if let Err(e) = write.write_all(&out).await {
        debug!(error = %e, "the CNI plugin left before the reply");
    }
}

fn stopping() -> Reply {
    Reply::Refused {
        reason: "meshd is stopping on this node; retry once it is back".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, Write};

    fn pod() -> CniPod {
        CniPod {
            namespace: "default".into(),
            name: "web-0".into(),
            uid: None,
            container_id: "c".into(),
            netns: Some("/var/run/netns/x".into()),
            ifname: "eth0".into(),
            ips: vec!["10.91.1.5".parse().unwrap()],
        }
    }

    fn call(path: &Path, line: &[u8]) -> Reply {
        let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
        (&stream).write_all(line).unwrap();
        let mut reader = std::io::BufReader::new(&stream);
        let mut buf = String::new();
        reader.read_line(&mut buf).unwrap();
        serde_json::from_str(&buf).unwrap()
    }

    #[tokio::test]
    async fn requests_reach_the_handler_and_its_answer_the_plugin() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/cni.sock");
        let (server, mut rx) = CniServer::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let handler = tokio::spawn(async move {
            let req = rx.recv().await.unwrap();
            assert_eq!(req.request, Request::Add(pod()));
            req.answer(Reply::Refused {
                reason: "no".into(),
            });
            // The next one is dropped unanswered: the agent is stopping.
            drop(rx.recv().await.unwrap());
        });
        let mut line = serde_json::to_vec(&Request::Add(pod())).unwrap();
        line.push(b'\n');
        let p = path.clone();
        let l = line.clone();
        let reply = tokio::task::spawn_blocking(move || call(&p, &l))
            .await
            .unwrap();
        assert_eq!(
            reply,
            Reply::Refused {
                reason: "no".into()
            }
        );
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || call(&p, &line))
            .await
            .unwrap();
        assert!(matches!(reply, Reply::Refused { ref reason } if reason.contains("stopping")));
        let p = path.clone();
        let reply = tokio::task::spawn_blocking(move || call(&p, b"{\"command\":\"add\"}\n"))
            .await
            .unwrap();
        assert!(
            matches!(reply, Reply::Invalid { ref reason } if reason.contains("does not decode")),
            "{reply:?}"
        );
        handler.await.unwrap();
        // A second agent on the same socket is refused; once the first is gone its stale
        // socket is replaced.
        assert!(matches!(CniServer::bind(&path).await, Err(Error::InUse(_))));
        drop(server);
        assert!(!path.exists());
        std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (_again, _rx) = CniServer::bind(&path).await.unwrap();
    }
}
