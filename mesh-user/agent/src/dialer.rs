//! How the proxy opens sockets inside a pod: a socket factory per pod network namespace.
#![warn(missing_docs)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::RwLock;

use mesh_dataplane::netns::SocketFactory;
use mesh_proxy::{DialFuture, DialKind, Dialer};

/// Opens the proxy's connections from inside each pod's network namespace, marked as the
/// agent's own.
#[derive(Default)]
pub struct NetnsDialer {
    pods: RwLock<HashMap<String, SocketFactory>>,
}

impl NetnsDialer {
    /// Dials for pod `pod` (its workload id) through `sockets` from now on, replacing any
    /// factory it had.
    pub fn add(&self, pod: &str, sockets: SocketFactory) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pod.to_string(), sockets);
    }

    /// Forgets the pod: later dials for it fail with `NotFound`. Its factory thread ends once
    /// the dials in flight (which hold a handle) are done.
    pub fn remove(&self, pod: &str) {
        self.pods
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(pod);
    }
}

impl Dialer for NetnsDialer {
    fn connect<'a>(&'a self, pod: &'a str, kind: DialKind, addr: SocketAddr) -> DialFuture<'a> {
        let factory = self
            .pods
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .cloned();
        Box::pin(async move {
            match factory {
                Some(f) if kind == DialKind::Splice => {
                    let socket = f.tcp_socket().await?;
                    socket.bind(&SocketAddr::from((mesh_proxy::SPLICE_SOURCE, 0)).into())?;
                    let stream: std::net::TcpStream = socket.into();
                    tokio::net::TcpSocket::from_std_stream(stream)
                        .connect(addr)
                        .await
                }
                Some(f) => f.connect(addr).await,
                None => Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("pod {pod} is not served by this agent"),
                )),
            }
        })
    }
}
