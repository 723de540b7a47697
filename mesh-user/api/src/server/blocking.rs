//! Consul's blocking queries: a read with `?index=N` waits until the index of what it reads
//! grows past `N` (or falls below it: the catalog's index restarts with the agent), or
//! until `?wait=` has passed (default 5 minutes, at most 10, Go duration
//! syntax: `30s`, `1m30s`, `250ms`), then answers as usual with the index now in
//! `X-Consul-Index`. Without `?index=` (or with 0) a read answers at once. As Consul's
//! `agent/http.go` and `agent/consul/rpc.go`: an index or wait that does not parse is a 400
//! (`Invalid index`, `Invalid wait time`), a wait of 0 means the default and one over the
//! maximum is cut to it. (Consul adds up to wait/16 of random jitter; this agent does not.)
//!
//! A waiting read wakes at every change of the store (intentions, config entries, tokens)
//! and of the published catalog (instances, readiness), and answers once its own index has
//! grown; a read whose index never grows answers when the wait is over, or at once when the
//! server stops.

use std::time::Duration;

use super::{AppState, Params};
use crate::Error;

/// The wait of a blocking query that gives none (Consul's `DefaultQueryTime`).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// The longest wait (Consul's `MaxQueryTime`); longer ones are cut to it.
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);

/// A blocking query: wait while the index is at most `index`, for at most `wait`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Blocking {
    /// The index the client has seen.
    pub index: u64,
    /// How long to wait at most.
    pub wait: Duration,
}

impl Params {
    /// `?index=` and `?wait=`: `None` when the read must not block (no index, or 0).
    pub(crate) fn blocking(&self) -> Result<Option<Blocking>, Error> {
        let wait = match self.optional("wait")? {
            None | Some("") => DEFAULT_WAIT,
            Some(w) => match parse_go_duration(w) {
                Some(d) if d.is_zero() => DEFAULT_WAIT,
                Some(d) => d.min(MAX_WAIT),
                None => {
                    return Err(Error::bad(
                        "wait",
                        format!(
                        "Invalid wait time: {w:?} is not a duration (Go syntax: 30s, 1m30s, 250ms)"
                    ),
                    ))
                }
            },
        };
        let index = match self.optional("index")? {
            None | Some("") => return Ok(None),
            Some(i) => i.parse::<u64>().map_err(|_| {
                Error::bad(
                    "index",
                    format!("Invalid index: {i:?} is not an index (an unsigned integer)"),
                )
            })?,
        };
        Ok((index > 0).then_some(Blocking { index, wait }))
    }
}

/// Waits, for a blocking query, until `index(st)` differs from the client's index or the
/// wait is over; returns at once when `blocking` is `None`. An index below the client's (the
/// catalog's restarts with the agent) answers at once too, so that a client holding an index
/// from before a restart gets the state now, and the index to wait on, without waiting out
/// `wait` (Consul's clients reset an index that goes backwards).
pub(crate) async fn block(
    st: &AppState,
    blocking: Option<Blocking>,
    index: impl Fn(&AppState) -> u64,
) {
    let Some(b) = blocking else { return };
    // Subscribed before the index is read: a change in between still wakes the wait.
    let mut store = st.store.subscribe();
    let mut catalog = st.catalog.subscribe();
    let mut stopped = st.stopped.clone();
    let deadline = tokio::time::Instant::now() + b.wait;
    // As answered in X-Consul-Index: at least 1.
    while index(st).max(1) == b.index && !*stopped.borrow_and_update() {
        tokio::select! {
            r = store.changed() => if r.is_err() { return },
            r = catalog.changed() => if r.is_err() { return },
            r = stopped.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

/// The index of everything the catalog endpoints answer from: the published catalog's and
/// the intentions'. Both only grow, so their sum grows whenever either changes.
pub(crate) fn mesh_index(st: &AppState) -> u64 {
    st.catalog.current().0 + st.store.state().rules.index()
}

/// The index of the intentions and config entries.
pub(crate) fn rules_index(st: &AppState) -> u64 {
    st.store.state().rules.index()
}

/// Parses a duration in Go's `time.ParseDuration` syntax: a sequence of decimal numbers,
/// each with an optional fraction and a unit (`ns`, `us`, `µs`, `ms`, `s`, `m`, `h`), such
/// as `300ms`, `1.5h` or `2h45m`, optionally signed with `+`; `0` alone is zero. `None` for
/// anything else, a negative duration, or one that overflows.
pub fn parse_go_duration(input: &str) -> Option<Duration> {
    let s = input.strip_prefix('+').unwrap_or(input);
    if s == "0" {
        return Some(Duration::ZERO);
    }
    if s.is_empty() {
        return None;
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(int_len);
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => {
                let n = a.bytes().take_while(u8::is_ascii_digit).count();
                a.split_at(n)
            }
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3600 * 1_000_000_000,
            _ => return None,
        };
        let whole: u128 = if int.is_empty() { 0 } else { int.parse().ok()? };
        let mut part = whole.checked_mul(nanos)?;
        if !frac.is_empty() {
            // Digits beyond nanoseconds do not count (Go keeps them only to round).
            let digits = &frac[..frac.len().min(18)];
            let scale = 10u128.pow(u32::try_from(digits.len()).ok()?);
            part = part.checked_add(digits.parse::<u128>().ok()? * nanos / scale)?;
        }
        total = total.checked_add(part)?;
        rest = after;
    }
    // Go's limit: about 290 years in an int64 of nanoseconds.
    if total > i64::MAX as u128 {
        return None;
    }
    let secs = u64::try_from(total / 1_000_000_000).ok()?;
    Some(Duration::new(secs, (total % 1_000_000_000) as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let ok = [
            ("0", Duration::ZERO),
            ("5s", Duration::from_secs(5)),
            ("+5s", Duration::from_secs(5)),
            ("1m30s", Duration::from_secs(90)),
            ("300ms", Duration::from_millis(300)),
            ("1.5h", Duration::from_secs(5400)),
            ("2h45m", Duration::from_secs(9900)),
            (".5s", Duration::from_millis(500)),
            ("1us", Duration::from_micros(1)),
            ("1µs", Duration::from_micros(1)),
            ("10ns", Duration::from_nanos(10)),
            ("0s", Duration::ZERO),
        ];
        for (s, d) in ok {
            assert_eq!(parse_go_duration(s), Some(d), "{s}");
        }
        for bad in [
            "",
            "5",
            "s",
            "-5s",
            "5 s",
            "5x",
            "1.s.",
            "1m30",
            "abc",
            "5S",
            "9999999999h",
            ".",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn blocking_parameters() {
        let p = |q: &str| Params::new(Some(q.to_owned())).blocking();
        assert_eq!(p("").unwrap(), None);
        assert_eq!(p("index=0").unwrap(), None);
        assert_eq!(p("wait=5s").unwrap(), None);
        assert_eq!(
            p("index=7").unwrap(),
            Some(Blocking {
                index: 7,
                wait: DEFAULT_WAIT
            })
        );
        assert_eq!(
            p("index=7&wait=2s").unwrap(),
            Some(Blocking {
                index: 7,
                wait: Duration::from_secs(2)
            })
        );
        assert_eq!(p("index=7&wait=1h").unwrap().unwrap().wait, MAX_WAIT);
        assert_eq!(p("index=7&wait=0").unwrap().unwrap().wait, DEFAULT_WAIT);
        let e = p("index=x").unwrap_err();
        assert_eq!(e.field(), Some("index"));
        assert!(e.to_string().starts_with("Invalid index"), "{e}");
        let e = p("index=3&wait=5").unwrap_err();
        assert_eq!(e.field(), Some("wait"));
        assert!(e.to_string().starts_with("Invalid wait time"), "{e}");
    }
}
