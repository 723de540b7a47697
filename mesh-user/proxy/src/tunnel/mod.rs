//! App connections between nodes as streams of pooled HTTP/2 mTLS connections, the way Istio's
//! HBONE carries them: each app connection is one HTTP/2 `CONNECT` stream, whose `:authority`
//! is the destination pod's address and app port, over a long-lived mTLS connection between
//! the two agents that offered and accepted ALPN `h2`.
//!
//! - [`pool`]: the outbound side. One pool per (source identity, destination identity, peer
//!   inbound listener); a stream goes on a pooled connection with fewer than
//!   [`ProxyConfig::pool_max_streams`](crate::ProxyConfig::pool_max_streams) open streams, or a
//!   new connection when all are full; a connection without streams for
//!   [`ProxyConfig::pool_idle_timeout`](crate::ProxyConfig::pool_idle_timeout) is closed. A
//!   peer that does not select `h2` (an agent from before pooling) gets the connection as
//!   before: one TLS connection for this one app connection.
//! - [`server`]: the inbound side. The TLS handshake, the caller's identity (from the
//!   connection's client certificate) and the connection limits are the inbound listener's as
//!   for any connection; then each stream is authorized on its own (the same authorizer,
//!   counters and metrics as a connection), registered for revocation on its own (a new deny
//!   resets that stream only), and copied to the app inside the pod.
//! - [`H2Io`]: one stream as a byte stream for the copy loop, with per-stream flow control:
//!   received bytes are released to the peer's window only once they have been handed on.
//! - Early data: what the app has already sent when its connection is accepted goes out as
//!   DATA right behind the stream's `CONNECT` ([`peek_early`]), so that the peer has the first
//!   request once it accepts the stream rather than one round trip between the agents later.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::copy::Reset;

pub(crate) mod pool;
pub(crate) mod server;

/// The ALPN protocol id of a pooled connection (RFC 7540 §3.3).
pub(crate) const ALPN_H2: &[u8] = b"h2";

/// The request header that names the caller's SPIFFE ID on a stream. The inbound side takes
/// the identity from the connection's client certificate and refuses a stream whose header
/// names another one.
pub(crate) const SOURCE_HEADER: &str = "x-mesh-source";

/// HTTP/2 receive window per stream, in bytes: how much one stream may have in flight before
/// its reader takes it.
pub(crate) const STREAM_WINDOW: u32 = 1 << 20;

/// HTTP/2 receive window of a whole connection, in bytes.
pub(crate) const CONNECTION_WINDOW: u32 = 16 << 20;

/// Largest HTTP/2 DATA frame accepted, in bytes.
pub(crate) const MAX_FRAME: u32 = 64 << 10;

/// Most bytes of an app connection sent as early data with its `CONNECT`, in bytes (well
/// within [`STREAM_WINDOW`], so they never wait for flow control).
pub(crate) const EARLY_DATA_MAX: usize = 16 << 10;

/// What the app has sent on `app` so far, up to [`EARLY_DATA_MAX`] bytes, **left in the
/// socket** (`recv` with `MSG_PEEK | MSG_DONTWAIT`); empty when nothing has arrived yet (a
/// protocol where the server speaks first) or the peek fails (logged at debug level).
///
/// The outbound side sends these bytes right behind the stream's `CONNECT` and takes them out
/// of the app's socket only once the peer has answered 200. The inbound side reads a stream's
/// bytes only after it has authorized the stream and connected to the app, so a refused
/// stream (403, 503, ...) has delivered nothing to the app, and after a 426 (the peer decides
/// request by request) the bytes are still in the socket for the connection of its own.
pub(crate) fn peek_early(app: &TcpStream) -> Bytes {
    // On the stack (no await here): only what arrived is copied to the heap.
    let mut buf = [0u8; EARLY_DATA_MAX];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recv(app.as_raw_fd(), &mut buf, flags) {
        Ok(n) => Bytes::copy_from_slice(&buf[..n]),
        Err(Errno::EAGAIN) => Bytes::new(),
        Err(e) => {
            tracing::debug!(error = %e, "peeking at the app's first bytes failed: no early data");
            Bytes::new()
        }
    }
}

/// Why a stream of a pooled connection could not be opened ([`crate::Error::Tunnel`]).
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    /// The `CONNECT` request could not be built.
    #[error("bad CONNECT request: {0}")]
    Request(String),
    /// HTTP/2 or the connection under it failed.
    #[error("{0}")]
    Io(#[source] io::Error),
    /// No answer within [`ProxyConfig::connect_timeout`](crate::ProxyConfig::connect_timeout).
    #[error("no answer within {0:?}")]
    Timeout(std::time::Duration),
    /// The peer refused the stream with this HTTP status (403: denied by intentions, 421:
    /// not a pod of the peer's, 400: a bad request, 502: the app did not answer).
    #[error("refused with status {0}")]
    Status(u16),
}

/// One HTTP/2 stream as a byte stream.
///
/// Reading hands out DATA frames and only then releases their bytes to the peer's flow-control
/// window, so a slow reader holds back its own stream and no other. Writing waits for window
/// capacity. Shutting down writing ends the stream's sending half (`END_STREAM`). Dropped before
/// both halves ended, or after [`Reset::arm_reset`], it resets the stream (`RST_STREAM`
/// `CANCEL`), so the peer never takes a cut stream for a complete one.
pub(crate) struct H2Io {
    send: SendStream<Bytes>,
    recv: RecvStream,
    pending: Bytes,
    sent_end: bool,
    received_end: bool,
    reset: AtomicBool,
}

impl H2Io {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            sent_end: false,
            received_end: false,
            reset: AtomicBool::new(false),
        }
    }
}

/// An HTTP/2 error as an I/O error: a reset by the peer is `ConnectionReset`.
pub(crate) fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    if e.is_reset() || e.is_go_away() {
        return io::Error::new(io::ErrorKind::ConnectionReset, e);
    }
    io::Error::other(e)
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Handed on: the peer may send that much more on this stream.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if this.received_end {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => {
                    this.received_end = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if let Poll::Ready(reason) = this.send.poll_reset(cx) {
            let reason = reason.map_err(h2_io)?;
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by the peer: {reason}"),
            )));
        }
        this.send.reserve_capacity(buf.len());
        let granted = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => 0,
        };
        if granted == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream can take no more data",
            )));
        }
        let n = granted.min(buf.len());
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 hands frames to its connection task as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.sent_end {
            this.send.send_data(Bytes::new(), true).map_err(h2_io)?;
            this.sent_end = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl Reset for H2Io {
    fn arm_reset(&self) {
        self.reset.store(true, Ordering::Relaxed);
    }
}

impl Drop for H2Io {
    fn drop(&mut self) {
        if self.reset.load(Ordering::Relaxed) || !(self.sent_end && self.received_end) {
            self.send.send_reset(Reason::CANCEL);
        }
    }
}
