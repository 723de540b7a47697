//! Copying bytes both ways between the app side and the network side of a connection: half-close,
//! idle timeout, fixed buffers, byte counts.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Error;

/// When bytes last moved on a connection, in milliseconds since `start`.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Relaxed))
    }

    /// Completes once nothing moved for `timeout`.
    async fn idle(&self, timeout: Duration) {
        loop {
            let Some(deadline) = self.last().checked_add(timeout) else {
                return std::future::pending().await;
            };
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A stream that counts the bytes written to it (here, into the pod's counter and into a
/// metric) and records activity on every read or write that moves bytes.
struct Metered<'a, S> {
    inner: S,
    written: u64,
    counter: &'a AtomicU64,
    metric: Option<&'a Counter>,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Metered<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Metered<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                let n64 = n as u64;
                this.written += n64;
                this.counter.fetch_add(n64, Relaxed);
                if let Some(metric) = this.metric {
                    metric.inc_by(n64);
                }
                this.activity.touch();
            }
        }
        res
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A connection that can be closed with a reset, so that a broken connection does not look
/// like a clean end of stream to the other side.
pub(crate) trait Reset {
    /// Makes the coming close a reset (`SO_LINGER` 0).
    fn arm_reset(&self);
}

impl Reset for TcpStream {
    fn arm_reset(&self) {
        let _ = self.set_zero_linger();
    }
}

impl Reset for tokio_rustls::client::TlsStream<TcpStream> {
    fn arm_reset(&self) {
        self.get_ref().0.arm_reset();
    }
}

impl Reset for tokio_rustls::server::TlsStream<TcpStream> {
    fn arm_reset(&self) {
        self.get_ref().0.arm_reset();
    }
}

/// Byte counts of one connection.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Transferred {
    /// Written to the app.
    pub(crate) to_app: u64,
    /// Written to the network side.
    pub(crate) from_app: u64,
}

/// Where the bytes of a connection are counted: the pod's counters, and the connection's
/// metrics when it has them.
pub(crate) struct Meters<'a> {
    /// The pod's count of bytes written to the app.
    pub(crate) to_app: &'a AtomicU64,
    /// The pod's count of bytes written to the network side.
    pub(crate) from_app: &'a AtomicU64,
    /// The metric of bytes written to the app.
    pub(crate) metric_to_app: Option<&'a Counter>,
    /// The metric of bytes written to the network side.
    pub(crate) metric_from_app: Option<&'a Counter>,
}

/// Copies between `app` and `remote` until both directions have ended (an end of stream on one
/// side shuts down writing on the other), an error, `idle` without a byte either way, or `stop`
/// completes (with the reason). Bytes written to the app are added to `meters.to_app` (and its
/// metric), bytes written to the remote side to `meters.from_app`. Both streams are closed on
/// return: with a reset after a copy error or a revocation (the other side must not take a
/// truncated stream for a complete one), normally otherwise.
pub(crate) async fn relay<A, R, S>(
    app: A,
    remote: R,
    buffer_size: usize,
    idle: Duration,
    meters: Meters<'_>,
    stop: S,
) -> (Transferred, Result<(), Error>)
where
    A: AsyncRead + AsyncWrite + Unpin + Reset,
    R: AsyncRead + AsyncWrite + Unpin + Reset,
    S: Future<Output = Error>,
{
    let activity = Activity::new();
    let mut app = Metered {
        inner: app,
        written: 0,
        counter: meters.to_app,
        metric: meters.metric_to_app,
        activity: &activity,
    };
    let mut remote = Metered {
        inner: remote,
        written: 0,
        counter: meters.from_app,
        metric: meters.metric_from_app,
        activity: &activity,
    };
    // copy_bidirectional_with_sizes panics on a zero size; the config is validated, this is a
    // second guard.
    let size = buffer_size.max(1);
    // `stop` first, on every poll: a revocation that came before the copy started (between the
    // authorizer's decision and here) must win over bytes already waiting to be copied, as
    // a pooled stream's early data is.
    let result = tokio::select! {
        biased;
        e = stop => Err(e),
        () = activity.idle(idle) => Err(Error::Idle(idle)),
        r = tokio::io::copy_bidirectional_with_sizes(&mut app, &mut remote, size, size) => {
            r.map(|_| ()).map_err(Error::Copy)
        }
    };
    if matches!(result, Err(Error::Copy(_) | Error::Revoked { .. })) {
        app.inner.arm_reset();
        remote.inner.arm_reset();
    }
    let transferred = Transferred {
        to_app: app.written,
        from_app: remote.written,
    };
    (transferred, result)
}
