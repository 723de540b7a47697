//! Rate limits for the proxy's refusal log lines, and the per-source cap on pending inbound
//! handshakes.
//!
//! A flood of refused connections must not become a flood of log lines: each pod has a
//! [`LogLimiter`] that lets at most `burst` lines of one [`LogKind`] through per `interval`
//! (fixed windows), counts the rest, and hands the count of suppressed lines to the next line
//! of that kind ("and K more suppressed"). The totals are in the pod's counters, never lost.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a rate-limited log line is about; each kind has its own budget per pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LogKind {
    /// An inbound connection refused by the pod's or the agent's connection limit.
    InboundLimit,
    /// An outbound connection refused by the pod's or the agent's connection limit.
    OutboundLimit,
    /// An inbound connection refused by the per-source cap on pending handshakes.
    PendingHandshakes,
    /// An inbound peer that sent no complete TLS ClientHello in time.
    PreHandshakeTimeout,
    /// Plaintext on the inbound listener.
    Plaintext,
    /// A TLS handshake that failed or timed out (either direction).
    Tls,
    /// A connection refused after authentication (intentions, port, server name).
    Denied,
    /// Any other refused connection (connect failures, unknown upstream, ...).
    Failed,
}

impl LogKind {
    const COUNT: usize = 8;

    fn index(self) -> usize {
        match self {
            Self::InboundLimit => 0,
            Self::OutboundLimit => 1,
            Self::PendingHandshakes => 2,
            Self::PreHandshakeTimeout => 3,
            Self::Plaintext => 4,
            Self::Tls => 5,
            Self::Denied => 6,
            Self::Failed => 7,
        }
    }
}

/// Locks a mutex, ignoring poisoning: the protected counters stay meaningful after a panic.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Window {
    /// Start of the current window; `None` before the first event.
    start: Option<Instant>,
    /// Lines let through in the current window.
    emitted: u32,
    /// Lines suppressed since the last line let through.
    suppressed: u64,
}

/// The decision for one log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Write the line; `suppressed` lines of its kind were dropped since the previous one.
    Emit {
        /// Lines dropped since the previous line of this kind.
        suppressed: u64,
    },
    /// Drop the line (it is counted and reported with the next line of its kind).
    Suppress,
}

/// At most `burst` lines per `interval` for each [`LogKind`].
#[derive(Debug)]
pub(crate) struct LogLimiter {
    interval: Duration,
    burst: u32,
    windows: [Mutex<Window>; LogKind::COUNT],
}

impl LogLimiter {
    /// A limiter letting `burst` lines of each kind through per `interval`.
    pub(crate) fn new(interval: Duration, burst: u32) -> Self {
        Self {
            interval,
            burst,
            windows: Default::default(),
        }
    }

    /// Decides about one line of `kind` now.
    pub(crate) fn check(&self, kind: LogKind) -> Verdict {
        self.check_at(kind, Instant::now())
    }

    /// Decides about one line of `kind` at `now` (monotonic; an earlier `now` than a previous
    /// call counts as the same window).
    pub(crate) fn check_at(&self, kind: LogKind, now: Instant) -> Verdict {
        let mut w = lock(&self.windows[kind.index()]);
        let expired = match w.start {
            None => true,
            Some(start) => now.saturating_duration_since(start) >= self.interval,
        };
        if expired {
            w.start = Some(now);
            w.emitted = 0;
        }
        if w.emitted < self.burst {
            w.emitted += 1;
            let suppressed = std::mem::take(&mut w.suppressed);
            Verdict::Emit { suppressed }
        } else {
            w.suppressed += 1;
            Verdict::Suppress
        }
    }
}

/// Shows ` (and K more suppressed)` after a log message when lines were dropped before it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Suppressed(pub(crate) u64);

impl fmt::Display for Suppressed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            0 => Ok(()),
            n => write!(f, " (and {n} more suppressed)"),
        }
    }
}

/// Counts the inbound connections of a pod still in the TLS handshake, per source IP.
#[derive(Debug)]
pub(crate) struct PendingHandshakes {
    cap: usize,
    by_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl PendingHandshakes {
    /// At most `cap` pending handshakes per source.
    pub(crate) fn new(cap: usize) -> Self {
        Self {
            cap,
            by_source: Arc::default(),
        }
    }

    /// Takes a pending slot for `source`, or `None` when it already has `cap` of them. The
    /// slot is freed when the guard drops.
    pub(crate) fn try_acquire(&self, source: IpAddr) -> Option<PendingGuard> {
        let source = source.to_canonical();
        let mut map = lock(&self.by_source);
        let n = map.entry(source).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(PendingGuard {
            by_source: Arc::clone(&self.by_source),
            source,
        })
    }

    /// Pending handshakes of `source` now.
    #[cfg(test)]
    pub(crate) fn pending(&self, source: IpAddr) -> usize {
        lock(&self.by_source)
            .get(&source.to_canonical())
            .copied()
            .unwrap_or(0)
    }

    /// Sources with a pending handshake now.
    #[cfg(test)]
    pub(crate) fn sources(&self) -> usize {
        lock(&self.by_source).len()
    }
}

/// One pending handshake; frees its slot on drop.
#[derive(Debug)]
pub(crate) struct PendingGuard {
    by_source: Arc<Mutex<HashMap<IpAddr, usize>>>,
    source: IpAddr,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        let mut map = lock(&self.by_source);
        if let Some(n) = map.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn one_line_per_interval_then_the_count_of_the_rest() {
        let limiter = LogLimiter::new(Duration::from_secs(1), 1);
        let t0 = Instant::now();
        assert_eq!(
            limiter.check_at(LogKind::Plaintext, t0),
            Verdict::Emit { suppressed: 0 }
        );
        for i in 0..999u64 {
            let at = t0 + Duration::from_micros(i * 900);
            assert_eq!(limiter.check_at(LogKind::Plaintext, at), Verdict::Suppress);
        }
        // Another kind has its own budget.
        assert_eq!(
            limiter.check_at(LogKind::Denied, t0),
            Verdict::Emit { suppressed: 0 }
        );
        // The next window's first line carries the count, once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            limiter.check_at(LogKind::Plaintext, t1),
            Verdict::Emit { suppressed: 999 }
        );
        assert_eq!(limiter.check_at(LogKind::Plaintext, t1), Verdict::Suppress);
        assert_eq!(
            limiter.check_at(LogKind::Plaintext, t1 + Duration::from_secs(5)),
            Verdict::Emit { suppressed: 1 }
        );
    }

    #[test]
    fn a_burst_lets_that_many_lines_through_per_window() {
        let limiter = LogLimiter::new(Duration::from_millis(100), 3);
        let t0 = Instant::now();
        let emitted = |from: Instant, n: u64| {
            (0..n)
                .filter(|i| {
                    matches!(
                        limiter.check_at(LogKind::Tls, from + Duration::from_micros(*i)),
                        Verdict::Emit { .. }
                    )
                })
                .count()
        };
        assert_eq!(emitted(t0, 50), 3);
        assert_eq!(emitted(t0 + Duration::from_millis(100), 50), 3);
        // A clock that goes backwards stays in the current window.
        assert_eq!(limiter.check_at(LogKind::Tls, t0), Verdict::Suppress);
    }

    #[test]
    fn suppressed_shows_only_when_lines_were_dropped() {
        assert_eq!(Suppressed(0).to_string(), "");
        assert_eq!(Suppressed(7).to_string(), " (and 7 more suppressed)");
    }

    #[test]
    fn pending_handshakes_are_capped_per_source_and_freed_on_drop() {
        let pending = PendingHandshakes::new(2);
        let a = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let b = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
        let g1 = pending.try_acquire(a).unwrap();
        let g2 = pending.try_acquire(a).unwrap();
        assert!(pending.try_acquire(a).is_none());
        // The v4-mapped IPv6 form is the same source.
        let mapped = IpAddr::V6(Ipv4Addr::new(10, 0, 0, 1).to_ipv6_mapped());
        assert!(pending.try_acquire(mapped).is_none());
        let g3 = pending.try_acquire(b).unwrap();
        assert_eq!(pending.pending(a), 2);
        drop(g1);
        assert_eq!(pending.pending(a), 1);
        let g4 = pending.try_acquire(mapped).unwrap();
        drop((g2, g3, g4));
        assert_eq!(pending.sources(), 0);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        drop(pending.try_acquire(v6).unwrap());
        assert_eq!(pending.sources(), 0);
    }
}
